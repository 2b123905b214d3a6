"""bfly: distributed training of our own VGG19 / ResNet50 on the Butterfly & Moth dataset."""
