"""kvrelay across hosts on one machine: network namespaces, a private switch, real links.

`python -m deploy.multihost` runs the scenario (deploy/multihost/scenario.py) and writes a
JSON report and a PNG; tests/deploy/test_multihost.py runs it with assertions.
"""
