"""S3 as the object store under everything: the client and its errors, URIs, buckets, the run leases that
keep one trainer per run, and Ray Train's checkpoint storage and its pruning."""
