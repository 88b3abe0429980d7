"""Firmware update task package."""
