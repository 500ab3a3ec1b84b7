"""The one place where mmt's library classes and functions are registered with gin.

Library modules never import gin (STYLE.md, principle 3): they take plain typed
arguments, and this module makes them bindable. Entry points import it through
`mmt.config.parse`. Names are short and unique so gin files read naturally
(`ShapesConfig.resolution = 64`).
"""

import gin

from mmt.data import shapes

gin.external_configurable(shapes.ShapesConfig, "ShapesConfig")
