"""Records: what the loop keeps. The prediction log (every answer), the feedback store (the
labels people gave), their shard format, and the labelled-folder importer.

Written by serving, read by training and monitoring: a shared package, importing only the
shared modules (config, digit_features, imaging, preprocess, errors), never a wing.
"""
