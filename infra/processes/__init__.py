"""Processes this project starts and stops: supervision by pid and process group (``supervise``) and
the interruption of a run by Ctrl-C, ``down`` or a Prefect cancellation (``interrupts``). Below every other
room: it imports none of them."""
