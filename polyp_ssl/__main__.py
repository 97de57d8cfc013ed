import sys

from polyp_ssl.entry import main

sys.exit(main())
