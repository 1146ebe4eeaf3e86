"""How runs are started: the simulation runner, the demo and the `fedgt` command line."""
