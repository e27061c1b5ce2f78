"""The version of localctx, in a module of its own so any module can name it without importing the
package's __init__ (and whatever that comes to import)."""
__version__ = "0.1.0"
