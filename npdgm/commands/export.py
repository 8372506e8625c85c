"""``npdgm export RUN OUT --format safetensors|onnx``: a trained model in the ecosystem's containers.

    npdgm export runs/vae --format safetensors vae.safetensors   # every parameter by name + the manifest
    npdgm export runs/vae --format onnx vae_onnx/                # one .onnx graph per use + manifest.json

A ``.safetensors`` file holds each parameter under its documented name (``encoder.0.W``, shape (in, out)) and
npdgm's manifest (kind, config, layout) as the JSON string ``__metadata__["npdgm"]``; ``npdgm.load`` reads it
back, and ``safetensors.numpy.load_file`` / ``safetensors.torch.load_file`` read the tensors without npdgm.
``--format onnx`` writes a directory of ONNX graphs (encode / decode / elbo, log_prob / sample, ...) and a
manifest naming their inputs and outputs (:mod:`npdgm.export_onnx`; needs the ``onnx`` package).
"""
from __future__ import annotations

import os

from .common import group

FORMATS = ("safetensors", "onnx")


def register(commands, train_commands):
    p = commands.add_parser("export", help="write a trained model as .safetensors or ONNX graphs",
                            description="Export the model of a run directory or checkpoint file. safetensors: every "
                                        "parameter by name, the manifest (kind, config, layout) as metadata; "
                                        "npdgm.load reads it back. onnx: a directory of ONNX graphs (opset 17, "
                                        "float32, symbolic batch) with manifest.json naming their inputs and "
                                        "outputs.")
    p.add_argument("run", metavar="RUN", help="a run directory or a checkpoint .npz")
    p.add_argument("out", metavar="OUT", help="the file to write (e.g. model.safetensors); "
                   "for --format onnx the directory to write")
    group(p, "output").add_argument("--format", choices=FORMATS, default="safetensors",
                                    help="container (default safetensors)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args):
    from ..io import model_to_safetensors
    from ..models.registry import load

    if args.format == "onnx":
        return _export_onnx(args.run, args.out)
    if os.path.isdir(args.out):
        raise ValueError(f"OUT {args.out} is a directory; give a file name such as model.safetensors")
    model = load(args.run)
    model_to_safetensors(model, args.out)
    print(f"wrote {args.out}: {model.kind}, {len(model.layout())} tensors, {model.num_parameters():,} parameters")


def _export_onnx(run, out):
    from ..export_onnx import export_onnx, onnx_graphs
    from ..models.registry import load

    model = load(run)
    onnx_graphs(model)          # refuse (one line) before creating OUT
    manifest = export_onnx(model, out)
    graphs = manifest["graphs"]
    print(f"wrote {out}: {model.kind}, {len(graphs)} graphs ({', '.join(graphs)}), opset {manifest['opset']}, "
          f"manifest.json")
