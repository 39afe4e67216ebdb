"""Several registries behind one name: what each upstream is (`spec`) and how requests reach it (`routing`)."""
