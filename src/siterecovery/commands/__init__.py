"""CLI commands by area, one module each (run, protection, deployments, demo). Each module registers
its commands on `siterecovery.cli.app`; cli.py imports every module here, so adding an area never
touches another area's file."""
