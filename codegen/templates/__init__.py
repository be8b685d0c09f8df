"""The jinja2 templates every code generator renders, through one environment."""
import jinja2

ENV = jinja2.Environment(loader=jinja2.PackageLoader("kiln.codegen", "templates"),
                         keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
