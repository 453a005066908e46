"""``python -m experiments.zoo``: the same as the ``deltadct-zoo`` command."""
import sys

from experiments.zoo import main

sys.exit(main())
