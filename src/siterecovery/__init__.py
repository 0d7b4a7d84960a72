"""siterecovery: recovery plans as code for site-to-site disaster recovery of virtual machines.

The core library: models, plan loading and validation, compilation, fabric drivers and the block
replication engine. It never imports prefect; flows/ and tasks/ at the repository root do.
"""

__version__ = "0.1.0"
