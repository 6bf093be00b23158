"""Bridges to other IML frameworks. Each module imports its framework only if it is installed.

- ``imdlbenco``: fastiml's NCL and MPC as IMDL-BenCo models (``FastimlNCL``, ``FastimlMPC``).
"""
