"""epd-ray: EPD-Net face de-identification trained and tuned with Ray."""

__version__ = "0.1.0"
