"""ResNet-18 on CIFAR-10 and ResNet-50 on CIFAR-100: models, data and the task plug-ins."""
