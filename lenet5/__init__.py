"""LeNet-5 on MNIST: model, data and the task plug-in the harness trains."""
