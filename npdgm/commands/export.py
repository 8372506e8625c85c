"""``npdgm export RUN --format safetensors OUT``: a trained model in the ecosystem's containers.

    npdgm export runs/vae --format safetensors vae.safetensors   # every parameter by name + the manifest

A ``.safetensors`` file holds each parameter under its documented name (``encoder.0.W``, shape (in, out)) and
npdgm's manifest (kind, config, layout) as the JSON string ``__metadata__["npdgm"]``; ``npdgm.load`` reads it
back, and ``safetensors.numpy.load_file`` / ``safetensors.torch.load_file`` read the tensors without npdgm.
"""
from __future__ import annotations

import os

from .common import group

FORMATS = ("safetensors",)


def register(commands, train_commands):
    p = commands.add_parser("export", help="write a trained model as .safetensors",
                            description="Export the model of a run directory or checkpoint file. safetensors: every "
                                        "parameter by name, the manifest (kind, config, layout) as metadata; "
                                        "npdgm.load reads it back.")
    p.add_argument("run", metavar="RUN", help="a run directory or a checkpoint .npz")
    p.add_argument("out", metavar="OUT", help="the file to write (e.g. model.safetensors)")
    group(p, "output").add_argument("--format", choices=FORMATS, default="safetensors",
                                    help="container (default safetensors)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args):
    from ..io import model_to_safetensors
    from ..models.registry import load

    if os.path.isdir(args.out):
        raise ValueError(f"OUT {args.out} is a directory; give a file name such as model.safetensors")
    model = load(args.run)
    model_to_safetensors(model, args.out)
    print(f"wrote {args.out}: {model.kind}, {len(model.layout())} tensors, {model.num_parameters():,} parameters")
