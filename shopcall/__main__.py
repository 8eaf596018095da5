import sys

from shopcall.cli import main

sys.exit(main())
