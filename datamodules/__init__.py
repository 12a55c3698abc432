"""Oracle datasets: HDF5 schema, generation, and (later) PyTorch datasets and DataModules."""
