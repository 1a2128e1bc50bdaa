# Used once to make DejaVuSans-subset.ttf (see DejaVuSans-LICENSE.txt): python3 font-origin-points.py IN.ttf OUT.ttf
# Gives every outlined glyph a zero-area one-point contour at the origin so its bounding box
# starts at x <= 0: plotters 0.3.7's ab_glyph text drawing places each glyph's box at the pen
# position and ignores the left side bearing, which makes spacing uneven ("f0d60b e").
import sys
from fontTools.ttLib import TTFont
f = TTFont(sys.argv[1])
glyf = f["glyf"]
n = 0
for name in f.getGlyphOrder():
    g = glyf[name]
    if g.isComposite() or g.numberOfContours <= 0:
        continue
    g.recalcBounds(glyf)
    if g.xMin <= 0:
        continue
    from fontTools.ttLib.tables._g_l_y_f import GlyphCoordinates
    coords = list(g.coordinates)
    flags = list(g.flags)
    coords.append((0, 0))
    flags.append(1)
    g.coordinates = GlyphCoordinates(coords)
    g.flags = bytearray(flags)
    g.endPtsOfContours = list(g.endPtsOfContours) + [len(coords) - 1]
    g.numberOfContours += 1
    f["hmtx"][name] = (f["hmtx"][name][0], 0)
    n += 1
f.save(sys.argv[2])
print("glyphs given an origin point:", n)
