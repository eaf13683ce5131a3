"""Getting a run's data: named datasets (``catalogue``), ImageFolder trees in a folder or S3 (``imagefolder``),
archives at http(s) URLs (``web``, through ``download`` and ``archives``), the local ``cache``; ``load``
picks the source of a ``--dataset``, ``spec`` turns raw arrays into a run's seeded splits."""
