"""Parallel layout: process groups per module (hetero), media balancing across ranks, CP helpers."""
