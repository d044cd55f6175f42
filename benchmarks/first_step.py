"""Run a training command in this process and stop it at its first optimizer step: prints `FIRST_STEP <seconds>`,
the time since EVERYDAY_T0 (the wall clock its parent, benchmarks/everyday_speed.py, read just before starting it).

    EVERYDAY_T0=$(date +%s.%N) python benchmarks/first_step.py shelltrain model=resnet18
    EVERYDAY_T0=$(date +%s.%N) python benchmarks/first_step.py benchmarks/plain_loop.py --epochs 1

torch is imported first here, to hook every optimizer's step; both commands import it before their first step
anyway, so the time to that step is the same sum in another order.
"""

import importlib
import os
import runpy
import sys
import time

T0 = float(os.environ["EVERYDAY_T0"])


def stop(optimizer, args, kwargs):
    sys.stdout.write(f"FIRST_STEP {time.time() - T0:.4f}\n")
    sys.stdout.flush()
    os._exit(0)


importlib.import_module("torch.optim.optimizer").register_optimizer_step_post_hook(stop)
command, sys.argv = sys.argv[1], sys.argv[1:]
if command == "shelltrain":
    from shelltrain.cli import main

    main()
else:
    runpy.run_path(command, run_name="__main__")
sys.exit(f"{command} finished without an optimizer step")
