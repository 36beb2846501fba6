from uspawn.cli import entry

entry()
