"""The ``ATTENTION`` registry: attention type name -> Linen module class.

Its own module, so that attention modules register themselves without
importing the package that imports them (``moejax/layers/attention/__init__.py``).
"""

from moejax.registry import Registry

ATTENTION = Registry("attention type")
