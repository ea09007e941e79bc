"""Where stages run: in-process (``local``) or as Kubernetes Jobs (``kubernetes``)."""
