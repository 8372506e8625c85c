"""Modules: stateful wrappers around the kernels (forward caches, backward accumulates grads)."""
from .conditional import ConditionalMLP
from .layers import INITS, MLP, Activation, Linear, Sequential, init_weight
from .module import Module, Parameter
