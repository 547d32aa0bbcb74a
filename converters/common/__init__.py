"""Model-independent pieces of the converter: tensor ops, TP/PP layout, checkpoint I/O."""
