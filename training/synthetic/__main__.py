"""python -m training.synthetic OUT --identities N --clips M --frames F --size S [--grid PNG]"""

import sys

from training.synthetic.cli import main

if __name__ == "__main__":
    sys.exit(main())
