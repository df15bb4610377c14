"""`python -m mnist_mlops.cli`: the same as the `mnist-mlops` console script."""

from mnist_mlops.cli import main

main()
