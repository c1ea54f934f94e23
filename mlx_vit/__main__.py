from mlx_vit.cli import main

main()
