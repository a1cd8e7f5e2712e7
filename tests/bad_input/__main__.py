from tests.bad_input import PAGE, render

PAGE.write_text(render())
print(f"wrote {PAGE}")
