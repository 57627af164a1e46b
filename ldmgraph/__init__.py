"""ldmgraph: latent-diffusion image synthesis as JSON workflow graphs of typed nodes."""

import time as _time

__version__ = "0.1.0"

STARTED = (_time.perf_counter(), _time.process_time())
"""Wall and CPU clocks when the package's first line ran: `ldmgraph run --profile` splits start-up here."""
