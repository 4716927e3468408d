"""Everything around the model at train time: data, optimizer, mesh, checkpoints, the loop."""
