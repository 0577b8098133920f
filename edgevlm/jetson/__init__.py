"""Jetson Orin: device facts, power modes, telemetry and the decode roofline.

Everything here parses text the device prints, so it is tested off-device on recorded
output; on the Orin the same code reads the real files and commands.
"""
