"""`python -m fer_search` is the fer-search command."""

from fer_search.cli import main

main(prog_name="fer-search")
