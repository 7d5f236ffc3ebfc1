"""``python -m fcclass``: the command line, also what ``torchrun -m fcclass train ...`` starts on every process."""

from fcclass.cli import main

main()
