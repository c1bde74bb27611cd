import sys

from vllm_jax.server import main

sys.exit(main())
