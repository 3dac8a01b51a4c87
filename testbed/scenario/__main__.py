"""`python -m testbed.scenario` prints the tables of docs/scenarios.md from the registry."""
from testbed import scenario

print(scenario.docs_tables(), end="")
