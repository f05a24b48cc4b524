"""Test and script harness: launchers (launch), Redis outage (outage), fuzzing (fuzz), durability under SIGKILL
(durability). An installed package, so scripts never import ``tests/``."""
