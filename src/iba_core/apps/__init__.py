"""Applications built on the engines: the ``iba`` command, demo data and figures,
evaluation metrics and plotting.  The math and the engines never import this package."""
