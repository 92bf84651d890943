from epd_ray.cli import main

main()
