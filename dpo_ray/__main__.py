import sys

from dpo_ray.cli import main

sys.exit(main())
