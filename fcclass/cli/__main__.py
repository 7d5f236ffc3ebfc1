"""python -m fcclass.cli"""

from fcclass.cli import main

main()
