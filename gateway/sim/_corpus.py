"""The text the simulated worker "generates": answers are token windows over this corpus, cycling.

Mostly plain English, with a few accented words, a dash and an emoji so that answers contain tokens that end in the
middle of a UTF-8 character and exercise incremental decoding.
"""

from typing import Final

CORPUS: Final = """\
The lighthouse keeper wrote the same first line in his log every evening: the lamp is lit, the glass is clean, \
the sea is where it was yesterday. Nobody had asked him to write it. He liked the way the sentence held still \
while everything around it moved, the gulls and the tide 🌊 and the slow ships that crossed the bay at dusk, \
watched by an old owl 🦉.

In the spring a surveyor arrived with a brass instrument and a notebook full of careful numbers. She measured the \
cliff, the path, the distance from the door to the edge, and she told him the rock was retreating by a hand's \
width every year. He asked how long the lighthouse had left. She did the sum twice and said about four hundred \
years, give or take a storm. He thanked her and made a pot of tea — strong, with too much sugar.

A good explanation starts with what the listener already knows. If you want to describe a network to someone who \
has never seen one, begin with the post office: letters, addresses, sorting rooms, the van that leaves at six. \
Then replace each piece with its quieter modern twin, one at a time, and stop when their eyes tell you the picture \
is complete. Most confusion comes from skipping a step that felt obvious to the person explaining it.

The café on the corner of the square opens at seven. By half past, the regulars have taken their usual tables: \
the retired teacher with the crossword, the two cyclists arguing about gears, the naïve young poet who still \
believes every draft will be the last one. The owner moved here from Zürich twenty years ago and has never once \
changed the menu. 🙂 When asked why, she says that people come back for the things that stay the same.

Rivers do not run straight for long. A small bend makes the water on the outside travel faster, which cuts the \
bank a little deeper, which makes the bend a little sharper. Given enough centuries the loop closes on itself, \
the river takes the short way through, and a quiet crescent lake is left behind in the meadow, full of reeds and \
herons and the memory of a current.
"""
