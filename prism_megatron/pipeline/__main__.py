import sys

from prism_megatron.pipeline.steps import main

sys.exit(main())
