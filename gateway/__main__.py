import sys

from stoker.gateway.server import main

sys.exit(main())
