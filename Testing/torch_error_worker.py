"""A worker whose model load raises a real torch error (torch.linalg.inv of a singular matrix raises
torch._C._LinAlgError, a class only torch defines), for test_worker's check that such an error reaches a client
that has no torch as a WorkerError naming it. The client starts it through a shell stand-in for its `python`;
the arguments are the worker's own (`-m ARSegLib.worker ADDRESS MODEL DEVICE`)."""

import sys

import torch

from ARSegLib import worker


def failing_load(self, job_id, args, cancelled):
    torch.linalg.inv(torch.zeros(2, 2))


worker._Server.op_load = failing_load
sys.exit(worker.serve_main(sys.argv[-3:]))
