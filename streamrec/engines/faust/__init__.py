"""The Faust engine: a Faust app with one thin agent and Faust tables around the core."""
