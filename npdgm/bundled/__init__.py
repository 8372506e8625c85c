"""Data that ships inside the package: ``mnist_subset.npz`` (10,000 train / 2,000 test real MNIST images).

Its source and licence (MNIST, CC BY-SA 3.0) are in ``NOTICE.md`` beside it, also in the wheel's licence files.
"""
