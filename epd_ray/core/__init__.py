"""The pure PyTorch core: networks, losses, metrics, image transforms, synthetic faces.

Nothing in this package imports Ray, so it can be tested and deployed alone.
"""
