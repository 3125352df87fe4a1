"""One module per stage of the workflow, named like its rule file (workflow/rules/<stage>.smk):
the functions the rule scripts call. Stages import the package; nothing in the package imports them."""
